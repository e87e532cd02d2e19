"""Running on Ray: a local Ray on loopback, job submission to a cluster, the jobs it ran."""
