"""`python -m sib ...` is the same as the `sib` console script."""

from sib.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
