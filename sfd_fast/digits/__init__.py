"""The embedded digits family: 8x8 scikit-learn digits, a class-conditional MLP teacher pretrained
and cached on first use, one-step generator sample grids and the eval.json metrics (UA, retained
accuracy, Frechet distances). Nothing is downloaded."""
