"""Running stages beyond one process: the multi-stage pipeline with its resumable state file, and submission
of commands as Ray jobs (``alia-nemo submit``) with the job-side entry point.
"""
