"""Data: synthetic clips, frame sampling, crop/resize, Jester and IsoGD loaders on tiny datasets
written by the tests (JPEG folders with Pillow, videos with PyAV)."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convlstm_fast.training.datasets import (JESTER_MEAN, DataError, IsoGDDataset,
                                             JesterDataset, crop_resize, preprocess,
                                             sample_frame_indices)
from convlstm_fast.training.synthetic import MOTIONS, SyntheticGestures


# -- synthetic ------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_balanced():
    a = SyntheticGestures(12, num_classes=6, frames=4, size=16, seed=3)
    b = SyntheticGestures(12, num_classes=6, frames=4, size=16, seed=3)
    other = SyntheticGestures(12, num_classes=6, frames=4, size=16, seed=4)
    clip, label = a[7]
    assert clip.shape == (3, 4, 16, 16) and clip.dtype == torch.float32
    torch.testing.assert_close(clip, b[7][0], rtol=0, atol=0)
    assert not torch.equal(clip, other[7][0])
    assert [a[i][1] for i in range(12)] == [i % 6 for i in range(12)]
    assert a.classes == list(MOTIONS[:6])


def test_synthetic_motion_is_visible():
    # Same seed, same clutter, distractor and noise: the swipe adds the hand's displacement to the
    # first-to-last-frame difference (measured: 19.0 vs 11.2 grey levels on average).
    g = torch.Generator
    from convlstm_fast.training.synthetic import render_clip
    swipe = render_clip("swipe_left", 6, 32, g().manual_seed(0))
    still = render_clip("still", 6, 32, g().manual_seed(0))
    motion = lambda clip: (clip[:, -1] - clip[:, 0]).abs().mean()
    assert motion(swipe) > motion(still) + 4.0


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticGestures(4, num_classes=len(MOTIONS) + 1)


# -- frame sampling (SPEC "Frames") -----------------------------------------------------------------
def test_sampling_fewer_frames_repeats_last():
    assert sample_frame_indices(3, 6, training=True) == [0, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("n, wanted", [(16, 16), (37, 8), (100, 16), (17, 16)])
def test_sampling_test_mode_is_floor_div_k(n, wanted):
    div = n / wanted
    assert sample_frame_indices(n, wanted, training=False) == [math.floor(div * k)
                                                               for k in range(wanted)]


@pytest.mark.parametrize("n, wanted", [(100, 8), (40, 8), (24, 8), (23, 8)])
def test_sampling_training_offsets_are_bounded(n, wanted):
    div = n / wanted
    bound = math.floor(div) // 4 if math.floor(div) >= 2 else 0
    seen = set()
    for seed in range(200):
        indices = sample_frame_indices(n, wanted, True, torch.Generator().manual_seed(seed))
        for k, index in enumerate(indices):
            offset = index - math.floor(div * k)
            assert 0 <= index < n
            if 0 < index < n - 1:
                assert abs(offset) <= bound
            seen.add(offset)
    assert max(seen) == bound  # the whole range is used
    if bound == 0:
        assert seen == {0}


# -- crop and resize --------------------------------------------------------------------------------
def _ramp_frames(t, h, w):
    y = torch.arange(h)[:, None].expand(h, w)
    x = torch.arange(w)[None, :].expand(h, w)
    frame = torch.stack([x % 256, y % 256, (x + y) % 256], dim=-1).to(torch.uint8)
    return frame[None].repeat(t, 1, 1, 1)


def test_crop_is_centred_in_test():
    frames = _ramp_frames(2, 20, 36)
    out = crop_resize(frames, 10, training=False)
    expected = frames[:, :, 8:28].permute(0, 3, 1, 2).float()
    expected = F.interpolate(expected, size=(10, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


def test_training_crop_is_one_draw_per_clip_within_range():
    frames = _ramp_frames(3, 36, 20)  # portrait: crop along H
    offsets = set()
    for seed in range(40):
        out = crop_resize(frames, 20, True, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(out[0], out[2], rtol=0, atol=0)  # same crop for every frame
        offset = int(out[0, 1, 0, 0])  # channel 1 holds the row index
        assert 0 <= offset <= 16
        offsets.add(offset)
    assert len(offsets) > 5


def test_preprocess_subtracts_mean_without_scaling():
    frames = torch.full((4, 8, 8, 3), 200, dtype=torch.uint8)
    clip = preprocess(frames, 2, 8, JESTER_MEAN, training=False)
    assert clip.shape == (3, 2, 8, 8)
    torch.testing.assert_close(clip[:, 0, 0, 0], torch.tensor([86.0, 91.0, 96.0]))


# -- Jester ---------------------------------------------------------------------------------------
COLOURS = {"v1": (200, 30, 30), "v2": (30, 200, 30), "v3": (30, 30, 200)}


def _write_jester(root, ids=("v1", "v2", "v3"), labels=("Swiping Left", "Thumb Up", "Swiping Left"),
                  frames=5):
    Image = pytest.importorskip("PIL.Image", reason="JPEG frames need Pillow")
    for video_id in ids:
        folder = root / "frames" / video_id
        folder.mkdir(parents=True)
        for k in range(frames):
            array = np.full((20, 30, 3), COLOURS[video_id], dtype=np.uint8)
            array[..., 0] = min(255, COLOURS[video_id][0] + 5 * k)
            Image.fromarray(array).save(folder / f"{k + 1:05d}.jpg", quality=95)
    (root / "labels.csv").write_text("Swiping Left\nThumb Up\nThumb Down\n")
    (root / "train.csv").write_text("".join(f"{i};{l}\n" for i, l in zip(ids, labels)))
    return root / "frames", root / "train.csv", root / "labels.csv"


def test_jester_loads_frames_labels_and_mean(tmp_path):
    frames, split, labels = _write_jester(tmp_path)
    ds = JesterDataset(frames, split, labels, frames=4, size=16)
    assert len(ds) == 3 and ds.num_classes == 3
    assert [ds[i][1] for i in range(3)] == [0, 1, 0]
    clip, _ = ds[1]
    assert clip.shape == (3, 4, 16, 16)
    expected = torch.tensor(COLOURS["v2"], dtype=torch.float32) - torch.tensor(JESTER_MEAN)
    torch.testing.assert_close(clip[:, 0].mean(dim=(1, 2)), expected, rtol=0, atol=4.0)


def test_jester_unknown_label_names_file_and_line(tmp_path):
    frames, split, labels = _write_jester(tmp_path, labels=("Swiping Left", "Waving", "Thumb Up"))
    with pytest.raises(DataError, match=r"train\.csv:2: unknown class 'Waving'"):
        JesterDataset(frames, split, labels)


def test_jester_missing_folder_errors_or_is_skipped_and_counted(tmp_path):
    frames, split, labels = _write_jester(tmp_path)
    split.write_text("v1;Swiping Left\nv9;Thumb Up\nv2;Thumb Up\n")
    with pytest.raises(DataError, match="v9"):
        JesterDataset(frames, split, labels)
    with pytest.warns(UserWarning, match="v9"):
        ds = JesterDataset(frames, split, labels, on_missing="skip", frames=2, size=16)
    assert len(ds) == 2 and len(ds.skipped) == 1
    assert [ds[i][1] for i in range(2)] == [0, 1]  # the labels stay with their videos


def test_jester_corrupt_jpeg_names_the_file(tmp_path):
    frames, split, labels = _write_jester(tmp_path)
    bad = frames / "v2" / "00003.jpg"
    bad.write_bytes(b"not a jpeg at all")
    ds = JesterDataset(frames, split, labels, frames=2, size=16)
    with pytest.raises(DataError, match="00003.jpg"):
        ds[1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = JesterDataset(frames, split, labels, on_missing="skip", check_files=True)
    assert len(checked) == 2 and "00003.jpg" in checked.skipped[0][1]
    assert any("00003.jpg" in str(w.message) for w in caught)


# -- IsoGD ----------------------------------------------------------------------------------------
def _write_video(path, values, size=(24, 40), codec="ffv1"):
    av = pytest.importorskip("av", reason="videos need PyAV")

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.height, stream.width = size
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for value in values:
            image = np.full((*size, 3), value, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_isogd(root):
    _write_video(root / "train/001/M_00001.avi", [10 * k for k in range(10)])
    _write_video(root / "train/001/K_00001.avi", [200] * 4)
    _write_video(root / "train/001/M_00002.avi", [120] * 3, codec="mpeg4")
    _write_video(root / "train/001/K_00002.avi", [50] * 3)
    lists = root / "train_list.txt"
    lists.write_text("train/001/M_00001.avi train/001/K_00001.avi 26\n"
                     "train/001/M_00002.avi train/001/K_00002.avi 249\n")
    return lists


def test_isogd_frames_labels_and_mean(tmp_path):
    lists = _write_isogd(tmp_path)
    ds = IsoGDDataset(tmp_path, lists, frames=5, size=16)
    assert len(ds) == 2 and [ds[i][1] for i in range(2)] == [25, 248]
    clip, _ = ds[0]
    # 10 frames, 5 wanted, test mode: frames 0, 2, 4, 6, 8 with values 10·k, minus mean 112.
    expected = torch.tensor([0.0, 20, 40, 60, 80]) - 112
    torch.testing.assert_close(clip[0].mean(dim=(1, 2)), expected, rtol=0, atol=1e-4)
    short, _ = ds[1]  # 3 frames of a lossy mpeg4 video, 5 wanted: the last is repeated
    assert short.shape == (3, 5, 16, 16)
    torch.testing.assert_close(short.mean(dim=(0, 2, 3)), torch.full((5,), 8.0), rtol=0, atol=4.0)
    depth = IsoGDDataset(tmp_path, lists, modality="depth", frames=2, size=16)
    torch.testing.assert_close(depth[0][0].mean(), torch.tensor(200.0 - 127.0), rtol=0, atol=1e-4)


def test_isogd_bad_lines_name_file_and_line(tmp_path):
    lists = _write_isogd(tmp_path)
    lists.write_text("train/001/M_00001.avi train/001/K_00001.avi 0\n")
    with pytest.raises(DataError, match=r"train_list\.txt:1: label 0 outside"):
        IsoGDDataset(tmp_path, lists)
    lists.write_text("train/001/M_00001.avi 3\n")
    with pytest.raises(DataError, match=r"train_list\.txt:1: expected"):
        IsoGDDataset(tmp_path, lists)


def test_isogd_missing_and_corrupt_videos(tmp_path):
    lists = _write_isogd(tmp_path)
    (tmp_path / "train/001/M_00002.avi").write_bytes(b"\x00garbage" * 50)
    lists.write_text(lists.read_text() + "train/002/M_00099.avi train/002/K_00099.avi 7\n")
    with pytest.raises(DataError, match="M_00099.avi"):
        IsoGDDataset(tmp_path, lists)
    with pytest.warns(UserWarning, match="M_00099.avi"):
        ds = IsoGDDataset(tmp_path, lists, on_missing="skip", frames=2, size=16)
    assert len(ds) == 2 and len(ds.skipped) == 1
    with pytest.raises(DataError, match="M_00002.avi"):
        ds[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checked = IsoGDDataset(tmp_path, lists, on_missing="skip", check_files=True)
    assert [label for _, label in checked.samples] == [25] and len(checked.skipped) == 2


def test_training_script_finds_the_distributed_layouts(tmp_path):
    from convlstm_fast.training.train import DEFAULTS, build_datasets

    jester = tmp_path / "jester"
    frames, split, labels = _write_jester(jester)
    frames.rename(jester / "20bn-jester-v1")
    split.rename(jester / "jester-v1-train.csv")
    labels.rename(jester / "jester-v1-labels.csv")
    (jester / "jester-v1-validation.csv").write_text("v3;Thumb Down\n")
    config = dict(DEFAULTS, dataset="jester", data=str(jester), frames=4, size=16)
    train_set, val_set = build_datasets(config)
    assert (len(train_set), len(val_set), val_set[0][1]) == (3, 1, 2)
    assert train_set.training and not val_set.training

    isogd = tmp_path / "isogd"
    lists = _write_isogd(isogd)
    (isogd / "valid_list.txt").write_text(lists.read_text())
    config = dict(DEFAULTS, dataset="isogd", data=str(isogd), frames=4, size=16)
    train_set, val_set = build_datasets(config, with_train=False)
    assert train_set is None and [label for _, label in val_set.samples] == [25, 248]
