from gnrev_plugin.hosts.benchopt.solvers import ExactGN as Solver  # noqa: F401
