"""Records to pages: the report model, statistics views, formats, plots, the paper's numbers, the site."""
