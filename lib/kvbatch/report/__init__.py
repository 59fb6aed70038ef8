"""Reports: headless notebook rendering into reports/ with an index (render), and reading a run folder back as
DataFrames for notebooks and users (results). `kvbatch.results.load_results` stays importable."""
