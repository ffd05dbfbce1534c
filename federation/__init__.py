"""Federation between domains: tokens, peers, the mTLS federation client, domain
resolution, bundle exchange and export policy."""
