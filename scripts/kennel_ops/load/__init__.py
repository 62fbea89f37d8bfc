"""Load testing and capacity planning for a kennel serving endpoint (kennel-loadtest
is kennel_ops.loadtest; the tests use these modules directly).

payloads   dog-photo-sized JPEG request bodies
users      kennel's Locust users (HTTP and the SageMaker runtime), for the command and for locustfiles
locust_steps  the load test's steps on Locust used as a library (imports Locust: the command only)
endpoint_metrics  a SageMaker endpoint's CloudWatch figures for a run's window
client     small bounded HTTP clients for the resilience tests and benchmarks (closed and open loop)
stats      percentiles, step summaries, the max-rate search, the recommendation, trends
docker_stats  CPU and memory of a container, sampled from the engine while a test runs
serving    start and stop the serving container (compose service or docker run)
report     the JSON report, the text table and the latency-vs-throughput plot
hostile    generated bad requests and the rule they must meet (the resilience tests)
bombs      small requests that ask a worker for a lot of memory or time (the request budget)
"""
