"""Secure aggregation (SecAgg+, Bell et al. 2020) inside random buckets, for robust rules.

``strategy.secagg``: each round the server cuts the hospitals that trained into random
buckets (:func:`coordinator.plan_buckets`); inside each, the hospitals' clipped, quantised
updates (:mod:`quantize`) are summed under pairwise and self masks (:mod:`member`), so the
server learns only each bucket's mean; the robust rule then runs over the bucket means
(bucketing, Karimireddy et al. 2022; secure buckets, SHARE, Velicheti et al. 2021).
Primitives: :mod:`crypto` (``cryptography``, ``pycryptodome``).
"""
