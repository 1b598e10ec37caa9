"""``python -m cirbench`` (also what ``torchrun -m cirbench`` runs)."""

from .cli import main

main()
