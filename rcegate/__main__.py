"""`python -m rcegate`: the same command as the `rcegate` script (also under torchrun)."""

from rcegate.cli import main

if __name__ == "__main__":
    main()
