"""hybridpd.httpkit: pieces shared by hybridpd's HTTP processes (API server, proxy).

Owns nothing request-specific: Prometheus text metrics (`metrics`), serving an aiohttp app
within connection bounds (`site`), bounded JSON bodies (`bodies`), API-key and internal-token
checks (`auth`) and rate-limited process logging (`logs`). Must not import `hybridpd.server`
or `hybridpd.proxy`.
"""
