"""The preference-data stage: TRL formats, labelers and their scorers, `nextbit compare`, sampling pairs of responses,
the Bradley–Terry model and the active-learning ensemble. What the alignment algorithms (align/) learn from."""
