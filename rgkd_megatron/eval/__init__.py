"""Evaluation: ROUGE-L, teacher NLL of student outputs, reward gap, gap closed, Markdown report."""
