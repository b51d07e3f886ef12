"""Jobs: tasks run on peers' containers, with files, logs, results and retries."""
