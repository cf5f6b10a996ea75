//! The only code that talks to etcd: Calico's etcdv3 key layout, typed get/list/CAS/watch.
