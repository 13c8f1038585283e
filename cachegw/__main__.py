"""`python -m cachegw`: the same as the `cachegw` command."""

from cachegw._cli import main

main()
