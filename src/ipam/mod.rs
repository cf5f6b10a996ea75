//! IP address management: blocks, affinities, handles. Pure allocation logic lives apart from the datastore
//! round trips so that it can be tested without etcd.
