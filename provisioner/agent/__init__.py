"""The host agent: one per GPU host, the only thing that touches its GPUs, taps and VMMs.

    ledger.py   what is leased to whom, on disk (GPUs, taps, addresses, controllers' lease times)
    host.py     the agent itself: inventory, VMs (create, watch, delete), re-adoption, the reaper
    server.py   its HTTP API on a Unix socket (`hearth agent`)
    client.py   the controller's side: the same API over the socket, locally or forwarded through SSH

The API (JSON; errors are {"error": "..."} with 400 bad input, 404 unknown VM, 409 lease conflict,
502 the VMM failed):

    GET    /v1/info                        agent and cloud-hypervisor versions, VFIO state, GPUs, network
    GET    /v1/gpus                        every usable GPU: NUMA node, IOMMU group functions, who leases it
    PUT    /v1/vms/{id}                    lease the GPUs, make the tap, start and boot the VM (idempotent)
    GET    /v1/vms/{id}?after=N&wait=S     the VM and its events; waits up to S s for more than N events
                       [&uid=U]            (only the incarnation the controller created as U)
    DELETE /v1/vms/{id}?grace=S            stop it, free its GPUs, tap and address
    POST   /v1/leases/{controller}?ttl=S   the controller is alive: keep its VMs for S more seconds
    DELETE /v1/leases/{controller}         the controller is done: stop all its VMs
"""
