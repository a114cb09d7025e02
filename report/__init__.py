"""`mnistq report`: one HTML page of a results CSV (report), its image sheet (sheet), the tally
of its rows (tally)."""
