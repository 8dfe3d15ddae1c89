"""Solvers, one layer under the networks: fixed points (plain iteration, Anderson), batched conjugate
gradients, sparse Cholesky for batches of one pattern, and the minimisers of the argmin layers.

- :mod:`deepunroll.optim.fixed_point`: ``fixed_point_iteration``, ``anderson``, ``solve_fixed_point``, ``FlatState``
- :mod:`deepunroll.optim.linear`: ``batched_cg`` and per-sample inner products
- :mod:`deepunroll.optim.ordering`: ``nested_dissection`` (fill-reducing order, separator tree)
- :mod:`deepunroll.optim.sparse_cholesky`: ``SparseCholesky`` (batched multifrontal factor and solve, one pattern)
- :mod:`deepunroll.optim.descent`: ``GradientDescent`` (FISTA with restart), ``ICM`` (labelling)
"""
