package main

import (
	"context"
	"log"
	"strings"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"recjob.dev/hack/cluster/internal/gateway"
)

// The Gateway API resources used (all gateway.networking.k8s.io/v1).
var (
	httpRoutes     = schema.GroupVersionResource{Group: gateway.Group, Version: "v1", Resource: "httproutes"}
	gateways       = schema.GroupVersionResource{Group: gateway.Group, Version: "v1", Resource: "gateways"}
	gatewayClasses = schema.GroupVersionResource{Group: gateway.Group, Version: "v1", Resource: "gatewayclasses"}
)

// gatewayKey is the queue key of the Gateway's (and its GatewayClass's) status; routes
// are queued as "namespace/name".
const gatewayKey = "gateway"

// snapshot is what the data plane serves, replaced as a whole on every change.
type snapshot struct {
	table    *gateway.Table
	attached map[string]int32 // routes per listener name
	summary  string           // the served routes, for the log
}

// controller keeps the routing table current and writes the status of the Gateway,
// its GatewayClass and the HTTPRoutes attached to it.
type controller struct {
	namespace, name, controllerName, address string
	client                                   dynamic.Interface
	routes, gateways                         cache.GenericLister
	services                                 corelisters.ServiceLister
	queue                                    workqueue.TypedRateLimitingInterface[string]
	current                                  atomic.Pointer[snapshot]
	synced                                   atomic.Bool // rebuild only once the caches are complete
}

// service looks a Service up in the cache (a gateway.Services).
func (c *controller) service(namespace, name string) (*corev1.Service, error) {
	return c.services.Services(namespace).Get(name)
}

// table is the routing table in force.
func (c *controller) table() *gateway.Table { return c.current.Load().table }

// gateway is the Gateway object, nil when it does not exist (yet).
func (c *controller) gateway() (*unstructured.Unstructured, *gateway.Gateway) {
	obj, err := c.gateways.ByNamespace(c.namespace).Get(c.name)
	if err != nil {
		return nil, nil
	}
	u := obj.(*unstructured.Unstructured)
	g, err := gateway.ParseGateway(u)
	if err != nil {
		log.Print(err)
		return nil, nil
	}
	return u, g
}

// rebuild recomputes the routing table from the caches.
func (c *controller) rebuild() {
	if !c.synced.Load() {
		return
	}
	next := &snapshot{table: &gateway.Table{}, attached: map[string]int32{}}
	if _, g := c.gateway(); g != nil {
		objs, _ := c.routes.List(labels.Everything())
		var routes []*gateway.Route
		for _, obj := range objs {
			route, err := gateway.ParseRoute(obj.(*unstructured.Unstructured))
			if err != nil {
				log.Print(err)
				continue
			}
			routes = append(routes, route)
		}
		next.table, next.attached = g.Attached(routes)
	}
	var keys []string
	for _, r := range next.table.Routes {
		keys = append(keys, r.Key())
	}
	next.summary = strings.Join(keys, " ")
	if previous := c.current.Swap(next); previous == nil || previous.summary != next.summary {
		log.Printf("serving %d HTTPRoutes: %s", len(keys), next.summary)
	}
}

// handlers are the informer handlers: rebuild, and queue what needs a status.
func (c *controller) routeHandler() cache.ResourceEventHandlerFuncs {
	onRoute := func(obj any) {
		c.rebuild()
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			c.queue.Add(key)
		}
		c.queue.Add(gatewayKey)
	}
	return cache.ResourceEventHandlerFuncs{AddFunc: onRoute, DeleteFunc: onRoute,
		UpdateFunc: func(_, obj any) { onRoute(obj) }}
}

func (c *controller) gatewayHandler() cache.ResourceEventHandlerFuncs {
	onGateway := func(any) {
		c.rebuild()
		c.queue.Add(gatewayKey)
		c.queueRoutes("")
	}
	return cache.ResourceEventHandlerFuncs{AddFunc: onGateway, DeleteFunc: onGateway,
		UpdateFunc: func(_, obj any) { onGateway(obj) }}
}

func (c *controller) serviceHandler() cache.ResourceEventHandlerFuncs {
	onService := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			namespace, _, _ := cache.SplitMetaNamespaceKey(key)
			c.queueRoutes(namespace) // their ResolvedRefs may change
		}
	}
	return cache.ResourceEventHandlerFuncs{AddFunc: onService, DeleteFunc: onService,
		UpdateFunc: func(_, obj any) { onService(obj) }}
}

// queueRoutes queues the status of every route of namespace ("": all).
func (c *controller) queueRoutes(namespace string) {
	lister := cache.GenericNamespaceLister(c.routes)
	if namespace != "" {
		lister = c.routes.ByNamespace(namespace)
	}
	objs, _ := lister.List(labels.Everything())
	for _, obj := range objs {
		if key, err := cache.MetaNamespaceKeyFunc(obj); err == nil {
			c.queue.Add(key)
		}
	}
}

// run writes statuses until the queue shuts down; failures are retried with back-off.
func (c *controller) run(ctx context.Context) {
	for {
		key, shutdown := c.queue.Get()
		if shutdown {
			return
		}
		var err error
		if key == gatewayKey {
			err = c.syncGateway(ctx)
		} else {
			err = c.syncRoute(ctx, key)
		}
		switch {
		case err == nil:
			c.queue.Forget(key)
		case apierrors.IsConflict(err): // a newer version is on its way through the informer
			c.queue.AddRateLimited(key)
		default:
			log.Printf("status of %s: %v (retrying)", key, err)
			c.queue.AddRateLimited(key)
		}
		c.queue.Done(key)
	}
}

// syncRoute writes one HTTPRoute's status.parents when it differs from what it should be.
func (c *controller) syncRoute(ctx context.Context, key string) error {
	namespace, name, _ := cache.SplitMetaNamespaceKey(key)
	obj, err := c.routes.ByNamespace(namespace).Get(name)
	_, g := c.gateway()
	if apierrors.IsNotFound(err) || g == nil {
		return nil // gone, or no Gateway to judge it by
	} else if err != nil {
		return err
	}
	route := obj.(*unstructured.Unstructured)
	parents, changed, err := gateway.RouteStatus(route, g, c.controllerName, c.service, time.Now())
	if err != nil || !changed {
		return err
	}
	route = route.DeepCopy()
	route.Object["status"] = map[string]any{"parents": parents}
	_, err = c.client.Resource(httpRoutes).Namespace(namespace).UpdateStatus(ctx, route, metav1.UpdateOptions{})
	if err == nil {
		log.Printf("HTTPRoute %s: status written", key)
	}
	return err
}

// syncGateway writes the Gateway's status and its GatewayClass's, when the class names
// this controller and the status differs.
func (c *controller) syncGateway(ctx context.Context) error {
	u, g := c.gateway()
	if g == nil {
		return nil
	}
	class, err := c.client.Resource(gatewayClasses).Get(ctx, g.Spec.GatewayClassName, metav1.GetOptions{})
	if err != nil {
		return err
	}
	if name, _, _ := unstructured.NestedString(class.Object, "spec", "controllerName"); name != c.controllerName {
		log.Printf("GatewayClass %s is for controller %q, not %q: Gateway status not written", class.GetName(), name, c.controllerName)
		return nil
	}
	now := time.Now()
	if conditions, changed, err := gateway.GatewayClassConditions(class, now); err != nil {
		return err
	} else if changed {
		class.Object["status"] = map[string]any{"conditions": conditions}
		if _, err := c.client.Resource(gatewayClasses).UpdateStatus(ctx, class, metav1.UpdateOptions{}); err != nil {
			return err
		}
	}
	status, changed, err := gateway.GatewayStatusFor(u, c.address, c.current.Load().attached, now)
	if err != nil || !changed {
		return err
	}
	u = u.DeepCopy()
	u.Object["status"] = status
	_, err = c.client.Resource(gateways).Namespace(c.namespace).UpdateStatus(ctx, u, metav1.UpdateOptions{})
	return err
}
