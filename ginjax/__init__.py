from ginjax import geometric
