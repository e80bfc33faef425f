from gnrev_plugin.hosts.benchopt.solvers import Adam as Solver  # noqa: F401
