"""``python -m convlstm_fast.evaluate``: see :mod:`convlstm_fast.training.evaluate`."""

from .training.evaluate import main

if __name__ == "__main__":
    main()
