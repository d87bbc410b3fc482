"""`chorus tune`: fit an ensemble to its members on a dev split, and measure it on a held-out one.

Modules: items (the data and its grading), calibration (per-member temperature), bootstrap (paired
intervals), search (candidate settings scored offline on first-step distributions), measure (the
served ensemble: first-step distributions and accuracy), tune (the whole procedure and its report).
"""
