"""MNIST-format IDX files from ``path`` (default: ``$GNREV_DATA_DIR`` or ``../shared/data/mnist``).

With only the ``t10k`` pair (the shared 10k test split), its first ``n_train`` images train and
its last ``n_test`` images test. Pixels are normalised as ``(x/255 − 0.1307)/0.3081``. Nothing is
downloaded: missing files skip this dataset with a message naming the expected files.
Select another folder with ``benchopt run BENCH -d "mnist[path=/data/mnist]"``.
"""

from benchopt import BaseDataset, safe_import_context

with safe_import_context() as import_ctx:
    import torch

    from gnrev_plugin.data import load_idx_dataset


class Dataset(BaseDataset):
    name = "mnist"
    parameters = {"path": [None], "n_train": [2000], "n_test": [1000]}
    test_parameters = {"n_train": [128], "n_test": [64]}

    def get_data(self):
        try:
            ds = load_idx_dataset(self.path, normalization="mnist", train_size=self.n_train,
                                  test_size=self.n_test, name="mnist")
        except FileNotFoundError as err:
            empty = torch.zeros(0, 784)
            return dict(X_train=empty, y_train=torch.zeros(0, dtype=torch.long), X_test=empty,
                        y_test=torch.zeros(0, dtype=torch.long), num_classes=10,
                        unavailable=f"mnist: {err} With benchopt, select the folder with "
                                    '-d "mnist[path=DIR]".')
        return dict(X_train=ds.x_train, y_train=ds.y_train, X_test=ds.x_test, y_test=ds.y_test,
                    num_classes=ds.num_classes)
