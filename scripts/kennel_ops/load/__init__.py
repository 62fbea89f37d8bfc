"""Load testing and capacity planning for a kennel serving endpoint.

payloads   dog-photo-sized JPEG request bodies
client     bounded HTTP load generators (closed loop by concurrency, open loop by rate)
stats      percentiles, step summaries, the max-rate search, the recommendation, trends
docker_stats  CPU and memory of a container, sampled from the engine while a test runs
serving    start and stop the serving container (compose service or docker run)
report     the JSON report, the text table and the latency-vs-throughput plot
"""
