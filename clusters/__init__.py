"""Clusters to run fedgw on: the network-namespace lab on one host, and kind."""
