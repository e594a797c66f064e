"""Evaluation: ROUGE-L, teacher NLL of student outputs, reward gap, gap closed, text diagnostics,
paired bootstrap intervals over held-out prompts, Markdown report."""
