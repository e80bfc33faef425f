from gnrev_plugin.hosts.benchopt.solvers import DenseGN as Solver  # noqa: F401
