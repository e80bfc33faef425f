"""gnrev-plugin: exact Gauss-Newton in reversible networks, curvature and NTK diagnostics."""

__version__ = "0.1.0"
