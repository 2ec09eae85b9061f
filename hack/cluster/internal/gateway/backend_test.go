package gateway

import (
	"math/rand/v2"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

func backend(name string, weight *int32) BackendRef {
	return BackendRef{Name: name, Port: ptr(int32(80)), Weight: weight}
}

func TestPickWeights(t *testing.T) {
	refs := []BackendRef{backend("stable", ptr(int32(90))), backend("off", ptr(int32(0))), backend("canary", ptr(int32(10)))}
	intn := rand.New(rand.NewPCG(1, 2)).IntN
	counts := map[string]int{}
	const n = 20000
	for range n {
		i, ok := Pick(refs, intn)
		if !ok {
			t.Fatal("no pick")
		}
		counts[refs[i].Name]++
	}
	if counts["off"] != 0 {
		t.Errorf("weight 0 picked %d times", counts["off"])
	}
	if share := float64(counts["canary"]) / n; share < 0.09 || share > 0.11 {
		t.Errorf("canary share %.3f, want about 0.10 (%v)", share, counts)
	}
	if counts["stable"]+counts["canary"] != n {
		t.Errorf("counts %v", counts)
	}
}

func TestPickDefaultsAndNone(t *testing.T) {
	intn := rand.New(rand.NewPCG(3, 4)).IntN
	counts := [2]int{}
	for range 10000 {
		i, _ := Pick([]BackendRef{backend("a", nil), backend("b", nil)}, intn) // weight 1 each
		counts[i]++
	}
	if counts[0] < 4700 || counts[1] < 4700 {
		t.Errorf("default weights not even: %v", counts)
	}
	for _, refs := range [][]BackendRef{nil, {backend("a", ptr(int32(0))), backend("b", ptr(int32(0)))}} {
		if i, ok := Pick(refs, intn); ok {
			t.Errorf("picked %d of %v", i, refs)
		}
	}
	if i, ok := Pick([]BackendRef{backend("zero", ptr(int32(0))), backend("only", ptr(int32(3)))}, intn); !ok || i != 1 {
		t.Errorf("got %d %v, want the only weighted ref", i, ok)
	}
}

// services is a fake lister over the given Services.
func services(list ...*corev1.Service) Services {
	return func(ns, name string) (*corev1.Service, error) {
		for _, s := range list {
			if s.Namespace == ns && s.Name == name {
				return s, nil
			}
		}
		return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "services"}, name)
	}
}

func service(name, clusterIP string, ports ...int32) *corev1.Service {
	s := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: name}, Spec: corev1.ServiceSpec{ClusterIP: clusterIP}}
	for _, p := range ports {
		s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Port: p})
	}
	return s
}

func TestResolve(t *testing.T) {
	lookup := services(service("m-predictor", "10.96.0.20", 80, 8080), service("headless", "None", 80))
	for _, tc := range []struct {
		name    string
		ref     BackendRef
		address string
		reason  string
	}{
		{"service port", BackendRef{Name: "m-predictor", Port: ptr(int32(8080))}, "10.96.0.20:8080", ""},
		{"explicit core Service", BackendRef{Group: ptr(""), Kind: ptr("Service"), Namespace: ptr("ml"), Name: "m-predictor", Port: ptr(int32(80))}, "10.96.0.20:80", ""},
		{"unknown Service", BackendRef{Name: "gone", Port: ptr(int32(80))}, "", ReasonBackendNotFound},
		{"port not on the Service", BackendRef{Name: "m-predictor", Port: ptr(int32(81))}, "", ReasonBackendNotFound},
		{"no port", BackendRef{Name: "m-predictor"}, "", ReasonBackendNotFound},
		{"headless", BackendRef{Name: "headless", Port: ptr(int32(80))}, "", ReasonBackendNotFound},
		{"other namespace", BackendRef{Name: "m-predictor", Namespace: ptr("other"), Port: ptr(int32(80))}, "", ReasonRefNotPermitted},
		{"other kind", BackendRef{Group: ptr("serving.kserve.io"), Kind: ptr("InferenceService"), Name: "m"}, "", ReasonInvalidKind},
	} {
		t.Run(tc.name, func(t *testing.T) {
			address, err := Resolve("ml", tc.ref, lookup)
			switch {
			case tc.reason == "" && err != nil:
				t.Fatalf("error %v", err)
			case tc.reason != "" && (err == nil || err.Reason != tc.reason):
				t.Fatalf("got %q %v, want reason %s", address, err, tc.reason)
			case address != tc.address:
				t.Fatalf("address %q, want %q", address, tc.address)
			}
		})
	}
}
