"""Anti-outlier smoothing internals: activation statistics (`stats`), exact folds into norms and
Linears (`fold`), and the m1..m6 scale computations and searches (`methods`). The public entry is
`calib.anti_outlier.apply_anti_outlier`."""
