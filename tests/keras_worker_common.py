"""What the Keras backend workers (keras_jax_worker.py, keras_tf_worker.py) do alike: train
fastadam's and Keras's optimizer on the same model, and save and load fastadam's. Imported
after the worker has set KERAS_BACKEND."""

import os
import tempfile

import numpy as np


def fit_both(ours, theirs, x, y):
    """Train both models alike; the largest difference between their weights."""
    for m in (ours, theirs):
        m.fit(x, y, batch_size=64, epochs=2, verbose=0, shuffle=False)
    return max(float(np.max(np.abs(a.numpy() - b.numpy())))
               for a, b in zip(ours.weights, theirs.weights))


def saved_and_loaded(model, x, y):
    """``model`` through ``model.save``/``keras.models.load_model``, then trained one
    epoch: (the loaded model, its optimizer's qualified class name, whether the loaded
    optimizer's variables equal the saved ones before that epoch)."""
    import keras

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
    optimizer = type(loaded.optimizer)
    same = all(np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(model.optimizer.variables, loaded.optimizer.variables))
    loaded.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    return loaded, f"{optimizer.__module__}.{optimizer.__name__}", same
