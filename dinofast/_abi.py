"""The op-schema version of dinofast._C, in one place: setup.py compiles it into the extension
(it reads this file without importing the package) and dinofast._backend refuses a _C built with
another one. Bump it whenever an op schema in csrc/registration.cpp changes."""
C_ABI_VERSION = 2
