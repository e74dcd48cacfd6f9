"""The site head's depth, prior and budget against the logistic-regression baseline on every proxy
site (frozen features, 20 labelled films per class, draws 0 and 1; macro-F1 on the rest of the site).

Usage: python benchmarks/site_adapt_variants.py   (after site_adapt_heads.py has cached the features)
"""
import sys, numpy as np
sys.path.insert(0,'benchmarks')
from site_adapt_heads import SITES, pools, draw, feature_cache, features, lr_baseline, macro, logits, MASKS
from covid_cxr.bundle import load_bundle
from covid_cxr.models.loading import load_torch
from covid_cxr.train.adapt import fit_site_head
b=load_bundle('runs/adapt-models/efficientnet_lite0/1'); m=load_torch(b); cl=list(b.classes)
pool,_=pools(); cache=feature_cache(m)
for name,site in SITES.items():
  present=sorted(cl.index(c) for c in site)
  for seed in (0,1):
    (li,ly),(ri,ry)=draw(site,pool,cl,20,seed)
    fx=features(b,m,[MASKS/'images'/f'{i}.png' for i in li+ri],cache); x,xt=fx[:len(li)],fx[len(li):]; y,yt=np.array(ly),np.array(ry)
    row=[f"LR {macro(yt,lr_baseline(x,y,xt,3),present)[0]:.3f}"]
    for d,p,st in (('last',0.1,300),('last',0.0,300),('last',0.0,1000),('head',0.0,300),('head',0.01,1000)):
      h=fit_site_head(m.head,x,y,depth=d,prior=p,steps=st,seed=seed)
      row.append(f"{d}/{p}/{st} {macro(yt,logits(h,xt).argmax(1),present)[0]:.3f}")
    print(name, seed, ' | '.join(row), flush=True)
