"""After (and around) the search: MLflow conventions, tables, reports, export of the winner."""
