"""Synthetic teacher-student classification (no files): ``y = argmax relu(x A) B``, ``x ~ N(0, I)``."""

from benchopt import BaseDataset, safe_import_context

with safe_import_context() as import_ctx:
    from gnrev_plugin.data import teacher_student


class Dataset(BaseDataset):
    name = "simulated"
    parameters = {"n_train": [512], "n_test": [256], "in_features": [32], "num_classes": [10]}
    test_parameters = {"n_train": [64], "n_test": [32]}

    def get_data(self):
        try:
            seed = self.get_seed(use_repetition=True)
        except ValueError:  # outside a benchopt run
            seed = 0
        ds = teacher_student(n_train=self.n_train, n_test=self.n_test,
                             in_features=self.in_features, num_classes=self.num_classes,
                             seed=int(seed) % 2**31)
        return dict(X_train=ds.x_train, y_train=ds.y_train, X_test=ds.x_test, y_test=ds.y_test,
                    num_classes=ds.num_classes)
