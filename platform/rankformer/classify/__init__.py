"""Gene and cell classification: labels, jobs, controls, tuning, and prediction on other corpora."""
