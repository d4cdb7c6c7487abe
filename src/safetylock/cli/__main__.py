"""`python -m safetylock.cli`: the same as the `safetylock` console script."""

from . import main

main()
