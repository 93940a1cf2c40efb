"""Text -> documents -> tokenizer -> uint16 shards + manifest -> blocks -> MLM batches.

sources.py reads inputs, tokenizer.py trains and loads the WordPiece tokenizer, prepare.py writes shards
(`fastcram data prepare`), loader.py feeds training, builtin.py prepares the shipped corpus (corpus/).
Imports only config, errors and files: never train, glue, benchmarks, export or cli.
"""
