from gnrev_plugin.hosts.benchopt.solvers import SGD as Solver  # noqa: F401
