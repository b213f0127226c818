"""Test configuration shared by the whole suite: the Hypothesis profiles.

Profiles (pick one with the ``HYPOTHESIS_PROFILE`` environment variable):

- ``ci`` (default): derandomized, so a CI run is reproducible; no deadline (a new shape
  compiles a JAX program, which takes a good fraction of a second); no example database.
  Property files size their own example counts for this profile (see
  ``parity/tests/test_properties.py``).
- ``release``: at least 200 examples per property, random draws, for the release check::

      HYPOTHESIS_PROFILE=release pytest parity/tests/test_properties.py
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

RELEASE_EXAMPLES = 200


def register_hypothesis_profiles() -> str:
    """Registers the ``ci`` and ``release`` profiles and loads the chosen one.

    Returns:
        The loaded profile's name (``HYPOTHESIS_PROFILE``, default ``"ci"``).

    Example:
        >>> register_hypothesis_profiles()
        'ci'
    """
    slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile(
        "ci", deadline=None, derandomize=True, database=None, max_examples=100,
        suppress_health_check=slow_ok, print_blob=True,
    )  # fmt: skip
    settings.register_profile(
        "release", deadline=None, max_examples=RELEASE_EXAMPLES, suppress_health_check=slow_ok,
        print_blob=True,
    )  # fmt: skip
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    settings.load_profile(name)
    return name


register_hypothesis_profiles()

# run as a script in a subprocess (it forces several host devices before JAX starts): never
# imported into the test process, not even by --doctest-modules
collect_ignore = ["sharding_script.py"]
