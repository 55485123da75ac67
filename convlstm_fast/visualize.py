"""``python -m convlstm_fast.visualize``: see :mod:`convlstm_fast.training.visualize`."""

from .training.visualize import main

if __name__ == "__main__":
    main()
