"""``python -m mechlens`` (also what ``torchrun -m mechlens ...`` runs)."""
import sys

from mechlens.cli import main

sys.exit(main())
