package zimage

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

// The collectors are package-level and built once: Caddy provisions the
// module for every site and makes a new registry on every reload, and a
// counter that restarted at zero on each reload would confuse rate().
// Each provisioning registers the same collectors with the registry at
// hand; AlreadyRegisteredError means a sibling handler did it first.
var (
	metricRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "requests_total",
		Help: "Requests answered by the zimage gateway, by endpoint, model and status code.",
	}, []string{"endpoint", "model", "code"})

	metricGeneration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "generation_duration_seconds",
		Help:    "Time the image service took per generation, retries included.",
		Buckets: []float64{0.5, 1, 2, 5, 10, 20, 30, 60, 120, 180},
	}, []string{"model"})

	metricEnhance = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "enhance_total",
		Help: "Prompt enhancement outcomes: ok, failed, skipped (no-enhance), disabled (no LLM configured), canceled (the client left while the LLM was asked).",
	}, []string{"outcome"})

	metricUpstreamErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "upstream_errors_total",
		Help: "Failed calls to the image service, by kind: timeout, refused, status_5xx, status_429, bad_response, blocked (a Cloudflare challenge), no_points (the account is out of points), proxy (the forward proxy failed).",
	}, []string{"kind"})

	metricInFlight = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "generations_in_flight",
		Help: "Generations currently running against the image service.",
	})

	metricQueueWait = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "queue_wait_seconds",
		Help:    "Time requests waited for a concurrency slot (max_concurrent).",
		Buckets: []float64{0.001, 0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60},
	})

	metricStoreImages = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "store_images_total",
		Help: "Images copied into the store, by result: stored (new), duplicate (the same bytes were there), failed (the answer kept the upstream URL).",
	}, []string{"result"})

	metricStoreDeleted = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "store_deleted_total",
		Help: "Stored images the retention sweep deleted (older than max_age).",
	})

	metricStoreServed = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "store_served_total",
		Help: "Requests for stored images, by status code.",
	}, []string{"code"})

	// Accounts by their names, never their keys
	metricPointsRemaining = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "upstream_points_remaining",
		Help: "Points left on each image service account, as the service reported after its last generation.",
	}, []string{"account"})

	metricPointsUsed = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "upstream_points_used_total",
		Help: "Points the image service reported spent, by account.",
	}, []string{"account"})

	metricAccountRests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "upstream_account_rests_total",
		Help: "Times an image service account was rested after a failure, by account and reason (status_429, status_5xx, refused, blocked, no_points).",
	}, []string{"account", "reason"})

	// Clients by their names, never their keys
	metricClientRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "client_requests_total",
		Help: "Requests answered by the zimage gateway, by client, endpoint and status code.",
	}, []string{"client", "endpoint", "code"})

	// By the configured model name, never the service's text
	metricModelMismatch = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "zimage", Name: "model_mismatch_total",
		Help: "Generations whose answer named another model (data.model_name) than the model's upstream_name, by configured model.",
	}, []string{"model"})

	collectors = []prometheus.Collector{
		metricRequests, metricGeneration, metricEnhance,
		metricUpstreamErrors, metricInFlight, metricQueueWait,
		metricStoreImages, metricStoreDeleted, metricStoreServed,
		metricPointsRemaining, metricPointsUsed, metricAccountRests,
		metricClientRequests, metricModelMismatch,
	}
)

// registerMetrics adds the collectors to Caddy's registry; a nil registry
// (metrics unavailable) is not an error.
func registerMetrics(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	for _, c := range collectors {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return err
			}
		}
	}
	return nil
}
