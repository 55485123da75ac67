"""``python -m convlstm_fast.train``: train GestureNet (see :mod:`convlstm_fast.training.train`)."""

from .training.train import main

if __name__ == "__main__":
    main()
