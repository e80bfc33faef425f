"""MNIST-1D (Greydanus & Kobak 2020): 40-dimensional signals, 10 classes, generated offline by the
``mnist1d`` package (``pip install mnist1d``; skipped with a message if it is missing)."""

from benchopt import BaseDataset, safe_import_context

with safe_import_context() as import_ctx:
    import torch

    from gnrev_plugin.data import load_mnist1d


class Dataset(BaseDataset):
    name = "mnist1d"
    requirements = ["pip::mnist1d"]
    parameters = {"num_samples": [5000]}
    test_parameters = {"num_samples": [200]}

    def get_data(self):
        try:
            ds = load_mnist1d(num_samples=self.num_samples, seed=42)
        except ImportError as err:
            empty = torch.zeros(0, 40)
            return dict(X_train=empty, y_train=torch.zeros(0, dtype=torch.long), X_test=empty,
                        y_test=torch.zeros(0, dtype=torch.long), num_classes=10,
                        unavailable=f"mnist1d: {err}")
        return dict(X_train=ds.x_train, y_train=ds.y_train, X_test=ds.x_test, y_test=ds.y_test,
                    num_classes=ds.num_classes)
