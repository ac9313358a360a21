"""Study files to trial specs: schemas, expansion and identity, planning, adaptive seeds, statistics."""
