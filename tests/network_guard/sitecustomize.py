"""Imported by every Python process that has this folder on PYTHONPATH (tests/conftest.py puts
it there): the network guard, when MCCKD_BLOCK_NETWORK=1."""

import mcckd_network_guard

mcckd_network_guard.install_if_requested()
