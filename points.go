package zimage

// Points (docs/design.md#points): what the service reports about an
// account's points after each generation, the warning below low_points,
// and the rest of an account that cannot pay for another generation.

import (
	"time"

	"go.uber.org/zap"
)

// allOutOfPoints reports whether every account of the pool rests for
// want of points: only then does the client hear of it (docs/design.md#failover-and-rests).
func (p *accountPool) allOutOfPoints() bool {
	now := time.Now()
	limMu.Lock()
	defer limMu.Unlock()
	for _, a := range p.accounts {
		if !now.Before(a.lim.noPointsUntil) {
			return false
		}
	}
	return true
}

// notePoints records the points the service reported for a's generation
// (docs/design.md#points), warns once when they cross below low_points, and rests
// the account as out of points when what is left would not pay for
// another generation like this one (docs/design.md#failover-and-rests).
func (p *accountPool) notePoints(a *account, info upstreamInfo) {
	if info.hasPointsUsed && info.pointsUsed > 0 {
		metricPointsUsed.WithLabelValues(a.name).Add(info.pointsUsed)
	}
	if info.hasPointsUsed && info.hasRemainingPoints && info.remainingPoints < info.pointsUsed {
		p.rest(a, &upstreamError{kind: kindNoPoints}, zap.Float64("remaining_points", info.remainingPoints),
			zap.Float64("points_used", info.pointsUsed))
	}
	if !info.hasRemainingPoints {
		return
	}
	metricPointsRemaining.WithLabelValues(a.name).Set(info.remainingPoints)
	if a.lowPoints <= 0 {
		return
	}
	below := info.remainingPoints < a.lowPoints
	limMu.Lock()
	crossed := below && !a.lim.lowPoints
	a.lim.lowPoints = below
	limMu.Unlock()
	if crossed {
		p.logger.Warn("image service account is low on points",
			zap.String("account", a.name), zap.Float64("remaining_points", info.remainingPoints),
			zap.Float64("low_points", a.lowPoints))
	}
}
