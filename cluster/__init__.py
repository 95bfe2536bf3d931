"""How replicas are placed and scaled: resource shapes and autoscaling defaults (shapes.py), an
autoscaling policy on the engines' own pressure signals (autoscaling.py), and launch files for
multi-node clusters (ray-cluster.yaml, rayservice.yaml)."""
