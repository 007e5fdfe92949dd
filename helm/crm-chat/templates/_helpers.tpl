{{/*
Chart name, truncated: Kubernetes names are DNS labels of at most 63 characters.
*/}}
{{- define "crm-chat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's resources: fullnameOverride, else "<release>-<chart>"
(just "<release>" when it already contains the chart name), at most 63 characters.
*/}}
{{- define "crm-chat.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"<chart>-<version>" for the helm.sh/chart label.
*/}}
{{- define "crm-chat.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: immutable once a Deployment exists, so only name and instance.
*/}}
{{- define "crm-chat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crm-chat.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels: selector labels plus the ones that may change between releases.
*/}}
{{- define "crm-chat.labels" -}}
helm.sh/chart: {{ include "crm-chat.chart" . }}
{{ include "crm-chat.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: crm-chat
{{- end }}

{{/*
Chat server component labels (selector: name, instance, component).
*/}}
{{- define "crm-chat.server.selectorLabels" -}}
{{ include "crm-chat.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "crm-chat.server.labels" -}}
{{ include "crm-chat.labels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Service account the chat pods run as.
*/}}
{{- define "crm-chat.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "crm-chat.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: repository, then "@digest" when a digest is given, else ":tag"
with the tag defaulting to the chart's appVersion.
*/}}
{{- define "crm-chat.image" -}}
{{- $img := .Values.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the JWT secret and API key.
*/}}
{{- define "crm-chat.secretName" -}}
{{- default (include "crm-chat.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{/*
Bundled Valkey: resource name (kept to 52 characters so StatefulSet pod labels
stay valid) and labels.
*/}}
{{- define "crm-chat.valkey.fullname" -}}
{{- printf "%s-valkey" (include "crm-chat.fullname" . | trunc 45 | trimSuffix "-") }}
{{- end }}

{{- define "crm-chat.valkey.selectorLabels" -}}
{{ include "crm-chat.selectorLabels" . }}
app.kubernetes.io/component: valkey
{{- end }}

{{- define "crm-chat.valkey.labels" -}}
{{ include "crm-chat.labels" . }}
app.kubernetes.io/component: valkey
{{- end }}

{{/*
Where CHAT_VALKEY__URL comes from: a dict with "name" and "key" of a Secret, or
empty when the URL is not set (embedded engine, or sentinels without a URL).
*/}}
{{- define "crm-chat.valkey.urlSecretRef" -}}
{{- $v := .Values.valkey }}
{{- if $v.existingSecret }}
{{- dict "name" $v.existingSecret "key" $v.existingSecretKey | toJson }}
{{- else if or $v.url $v.bundled.enabled }}
{{- dict "name" (include "crm-chat.valkey.fullname" .) "key" "url" | toJson }}
{{- else }}
{{- dict | toJson }}
{{- end }}
{{- end }}

{{/*
True ("true") when some shared Valkey is configured.
*/}}
{{- define "crm-chat.valkey.configured" -}}
{{- $v := .Values.valkey }}
{{- if or $v.url $v.existingSecret $v.sentinels $v.bundled.enabled }}true{{ end }}
{{- end }}

{{/*
True ("true") when the pod runs the embedded engine (no Valkey configured):
it then gets /var/lib/crm-chat, a PersistentVolumeClaim with
persistence.enabled, else an emptyDir.
*/}}
{{- define "crm-chat.embedded" -}}
{{- if not (include "crm-chat.valkey.configured" .) }}true{{ end }}
{{- end }}

{{/*
The claim of the embedded engine's data ("" without persistence).
*/}}
{{- define "crm-chat.dataClaim" -}}
{{- if and .Values.persistence.enabled (include "crm-chat.embedded" .) }}
{{- .Values.persistence.existingClaim | default (printf "%s-data" (include "crm-chat.fullname" .)) }}
{{- end }}
{{- end }}

{{/*
A secret value: the one given in values, else the one already stored in the
release's Secret (so upgrades keep it), else a new random one.
Call with (dict "ctx" $ "secret" "<secret name>" "key" "<data key>" "value" "<given>").
*/}}
{{- define "crm-chat.secretValue" -}}
{{- if .value }}
{{- .value }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .secret }}
{{- $stored := dig "data" .key "" ($existing | default dict) }}
{{- if $stored }}
{{- $stored | b64dec }}
{{- else }}
{{- randAlphaNum 48 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
An address the server listens on inside the pod: config.listenAddress and a
port. Call with (dict "ctx" $ "port" <port>).
*/}}
{{- define "crm-chat.listenOn" -}}
{{- $host := .ctx.Values.config.listenAddress }}
{{- if contains ":" $host }}
{{- printf "[%s]:%d" $host (int .port) }}
{{- else }}
{{- printf "%s:%d" $host (int .port) }}
{{- end }}
{{- end }}

{{/*
Public (server.listen) and internal (server.internal_listen) listen addresses.
*/}}
{{- define "crm-chat.listen" -}}
{{- include "crm-chat.listenOn" (dict "ctx" . "port" .Values.containerPort) }}
{{- end }}

{{- define "crm-chat.internalListen" -}}
{{- include "crm-chat.listenOn" (dict "ctx" . "port" .Values.internalContainerPort) }}
{{- end }}

{{/*
"true" when more than one chat pod may run (replicaCount > 1, or autoscaling):
then the PodDisruptionBudget and the default topology spread apply.
*/}}
{{- define "crm-chat.multiReplica" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{/*
Seconds the shutdown takes at most: readyz 503 for shutdownDelaySeconds, the
drain over drainSeconds, then up to 5 s for sessions to end.
*/}}
{{- define "crm-chat.shutdownSeconds" -}}
{{- add (int .Values.config.shutdownDelaySeconds) (int .Values.config.drainSeconds) 5 }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the value, or the shutdown plus 5 s of margin.
*/}}
{{- define "crm-chat.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (include "crm-chat.shutdownSeconds" . | int) 5 }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
Checksums of what the user gave, so pods roll when it changes and only then.
Generated secrets (kept across upgrades with lookup) are never hashed: with
`helm template` (Argo CD) they would be new random data every render and roll
every pod every time. Secrets named by existingSecret are outside the chart:
only their names are hashed.
*/}}
{{- define "crm-chat.checksum.secret" -}}
{{- $a := .Values.auth }}
{{- dict "existingSecret" $a.existingSecret "jwtSecret" $a.jwtSecret "apiKey" $a.apiKey "jwtSecretKey" $a.jwtSecretKey "apiKeyKey" $a.apiKeyKey | toJson | sha256sum }}
{{- end }}

{{- define "crm-chat.checksum.valkey" -}}
{{- $v := .Values.valkey }}
{{- dict "url" $v.url "existingSecret" $v.existingSecret "existingSecretKey" $v.existingSecretKey "bundled" $v.bundled.enabled "auth" $v.bundled.auth.enabled "password" $v.bundled.auth.password | toJson | sha256sum }}
{{- end }}

{{/*
A Kubernetes memory quantity ("1Gi", "512Mi", "1G", "1073741824") in bytes,
as an integer; fails on a form it does not know.
*/}}
{{- define "crm-chat.quantityBytes" -}}
{{- $q := toString . }}
{{- if not (regexMatch "^[0-9]+(\\.[0-9]+)?(Ki|Mi|Gi|Ti|k|K|M|G|T)?$" $q) }}
{{- fail (printf "crm-chat: cannot read the memory quantity %q (use e.g. 1Gi, 512Mi, 1G)" $q) }}
{{- end }}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $q }}
{{- $unit := trimPrefix $num $q }}
{{- $mult := dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 }}
{{- mulf (float64 $num) (get $mult $unit) | floor | int64 }}
{{- end }}

{{/*
Bundled Valkey maxmemory: valkey.bundled.maxmemory, else maxmemoryPercent of
the container memory limit, in bytes.
*/}}
{{- define "crm-chat.valkey.maxmemory" -}}
{{- $b := .Values.valkey.bundled }}
{{- if $b.maxmemory }}
{{- $b.maxmemory }}
{{- else }}
{{- $limit := dig "limits" "memory" "" ($b.resources | default dict) }}
{{- if not $limit }}
{{- fail "crm-chat: the bundled Valkey needs valkey.bundled.resources.limits.memory (maxmemory is derived from it) or valkey.bundled.maxmemory: without maxmemory the kernel OOM-kills Valkey instead of Valkey refusing writes." }}
{{- end }}
{{- $bytes := include "crm-chat.quantityBytes" $limit | float64 }}
{{- divf (mulf $bytes (int $b.maxmemoryPercent)) 100 | floor | int64 }}
{{- end }}
{{- end }}

{{/*
Checks that fail rendering with a clear message instead of deploying a setup
that cannot work.
*/}}
{{- define "crm-chat.validate" -}}
{{- $maxReplicas := int .Values.replicaCount }}
{{- if .Values.autoscaling.enabled }}
{{- $maxReplicas = int .Values.autoscaling.maxReplicas }}
{{- end }}
{{- if and (gt $maxReplicas 1) (not (include "crm-chat.valkey.configured" .)) }}
{{- fail (printf "crm-chat: up to %d replicas need a shared Valkey (history and fan-out go through it), but none is configured. Set valkey.url (or valkey.existingSecret, or valkey.sentinels), or valkey.bundled.enabled=true, or run a single replica (replicaCount=1, autoscaling.enabled=false)." $maxReplicas) }}
{{- end }}
{{- if and .Values.valkey.bundled.enabled (or .Values.valkey.url .Values.valkey.existingSecret .Values.valkey.sentinels) }}
{{- fail "crm-chat: valkey.bundled.enabled=true conflicts with an external Valkey (valkey.url, valkey.existingSecret or valkey.sentinels): choose one." }}
{{- end }}
{{- if and .Values.persistence.enabled (include "crm-chat.valkey.configured" .) }}
{{- fail "crm-chat: persistence.enabled=true is for the embedded engine (no Valkey); with Valkey, history is kept by Valkey (valkey.bundled.persistence for the bundled one)." }}
{{- end }}
{{- if and .Values.persistence.enabled .Values.updateStrategy (ne (.Values.updateStrategy.type | default "") "Recreate") }}
{{- fail "crm-chat: persistence.enabled=true needs updateStrategy type Recreate (or empty): two pods never open one data directory." }}
{{- end }}
{{- if and .Values.valkey.sentinels (not .Values.valkey.serviceName) }}
{{- fail "crm-chat: valkey.sentinels needs valkey.serviceName (the monitored master's name)." }}
{{- end }}
{{- if and .Values.valkey.cluster (not (or .Values.valkey.url .Values.valkey.existingSecret)) }}
{{- fail "crm-chat: valkey.cluster=true needs a seed node URL (valkey.url or valkey.existingSecret)." }}
{{- end }}
{{- if and .Values.valkey.cluster .Values.valkey.sentinels }}
{{- fail "crm-chat: valkey.cluster and valkey.sentinels exclude each other." }}
{{- end }}
{{- if and (eq .Values.config.profile "production") .Values.auth.devTokens }}
{{- fail "crm-chat: auth.devTokens=true is refused by the production profile (config.profile=production)." }}
{{- end }}
{{- $minGrace := include "crm-chat.shutdownSeconds" . | int }}
{{- $grace := include "crm-chat.terminationGracePeriodSeconds" . | int }}
{{- if lt $grace $minGrace }}
{{- fail (printf "crm-chat: terminationGracePeriodSeconds (%d) must be at least config.shutdownDelaySeconds + config.drainSeconds + 5 = %d, or pods are killed mid-drain (leave it null to derive it)." $grace $minGrace) }}
{{- end }}
{{- if eq (int .Values.containerPort) (int .Values.internalContainerPort) }}
{{- fail "crm-chat: containerPort and internalContainerPort must differ (public and internal listeners)." }}
{{- end }}
{{- if eq (int .Values.service.port) (int .Values.service.internalPort) }}
{{- fail "crm-chat: service.port and service.internalPort must differ." }}
{{- end }}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) }}
{{- fail "crm-chat: httpRoute.enabled=true needs httpRoute.parentRefs (the Gateway to attach to)." }}
{{- end }}
{{- if .Values.valkey.bundled.enabled }}
{{- $_ := include "crm-chat.valkey.maxmemory" . }}
{{- end }}
{{- range $k, $v := dict "jwtSecret" .Values.auth.jwtSecret "apiKey" .Values.auth.apiKey }}
{{- if and $v (lt (len $v) 32) (eq $.Values.config.profile "production") }}
{{- fail (printf "crm-chat: auth.%s must be at least 32 bytes (production profile)." $k) }}
{{- end }}
{{- end }}
{{- end }}
